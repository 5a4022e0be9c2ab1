"""How it learns: flow maths (flow.py), optimizer/schedule (optim.py), save plan (state.py), loop (loop.py)."""
