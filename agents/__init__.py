"""What runs on the device. Each agent is a standalone file shipped as is; see ort_agent.py."""
