"""Schedule rules: our CPU rules (``cpu.py``) and dlight's GPU rules as we apply them (``gpu.py``)."""
