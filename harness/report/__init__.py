"""Results for people and scripts: the table, JSON Lines and CSV (`output.py`), and the cache
as one HTML page with its figures (`html.py`)."""
