"""The stall zoo: a benchmark of detection, diagnosis and repair of training runs that do not learn.

Each scenario (``scenarios.py``) is a small plain PyTorch loop on seeded, generated data, labelled with
its true cause from ``stallguard.CAUSES`` or ``"healthy"``. The runner (``python -m benchmarks.zoo``)

1. runs each scenario unguarded, and its fixed twin, and marks it invalid when its fault does not show;
2. runs it under ``sg.Guard(model, opt)`` and scores ``guard.diagnose()``: the rank of the true cause,
   the first warning and its distance from the step the fault shows;
3. feeds the same per-step numbers to the published rules of smdebug, DeepDiagnosis, AutoTrainer and
   torch's ReduceLROnPlateau (``baselines.py``) and scores them the same way;
4. for faults an optimizer setting can fix, runs ``sg.Guard(model, opt, repair=True)`` and compares the
   final loss and the time with the unguarded run.

Usage::

    python -m benchmarks.zoo                      # everything
    python -m benchmarks.zoo --quick              # one scenario per cause + three healthy
    python -m benchmarks.zoo --only dead_bias_mlp --no-baselines
    python -m benchmarks.zoo --json zoo.json --results benchmarks/RESULTS.md
"""
