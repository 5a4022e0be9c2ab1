"""How it learns: flow maths and the objective (flow.py), the run's start shared by train, cache and the
benchmarks (setup.py), optimizer/schedule (optim.py), save plan (state.py), loop (loop.py)."""
