"""The orchestrator behind `koe5-run` (koe5/run.py is its command line), one decision a module:

- `plan.py`     what would run, without running it: `--dry-run`, `--emit`, `--from-run`'s spec file;
- `checks.py`   what must hold before anything is recorded: the data reads and tokenizes, no leakage
                beyond data.leakage, evaluation lengths the model can take;
- `decide.py`   what to do with a spec the registry has seen: skip it, resume its interrupted run, or
                start a new one; and whether a changed spec may resume. Only training runs count;
- `lifecycle.py` the run's life in the registry while ranks train: heartbeat, SIGTERM/Ctrl-C -> killed,
                folding the ranks' outputs in;
- `evaluation.py` the spec's evaluation of a model (trained or untrained), through koe5/eval/model_eval.py,
                the one recording path `koe5 eval` shares;
- `execute.py`  a new run or a resumed one, from queued to finished/failed/killed.
"""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
