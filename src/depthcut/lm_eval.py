"""lm-evaluation-harness's own command line, with depthcut's model and local benchmark data:

    python -m depthcut.lm_eval --model depthcut --model_args pretrained=smollm2-135m,dtype=float32 \\
        --tasks arc_easy,hellaswag --batch_size 16

takes exactly the arguments of ``lm_eval`` (``lm_eval --help``). lm-eval 0.4 finds models only in
its own registry and has no plugin entry points for them, so the plain ``lm_eval`` command cannot
see ``depthcut``: this module registers it, then runs lm-eval's command line. Unless
``--include_path`` is given, it also points lm-eval at depthcut's definitions of the built-in
benchmarks on local data (docs/tasks.md), so those run offline; every other task is lm-eval's.
"""

from __future__ import annotations

import sys

from depthcut.evaluation.tasks import local_tasks_folder


def main(argv: list[str] | None = None) -> None:
    # deferred: lm-eval takes seconds to import; only evaluation needs it
    from lm_eval.__main__ import cli_evaluate

    # deferred: registering the model imports torch; it is done when lm-eval's command runs
    import depthcut.evaluation.lm  # noqa: F401  (registers the model name "depthcut")

    args = list(sys.argv[1:] if argv is None else argv)
    if args and "--include_path" not in args and not any(a.startswith("--include_path=") for a in args) \
            and args[0] not in ("-h", "--help"):
        args += ["--include_path", str(local_tasks_folder())]
    sys.argv = [sys.argv[0], *args]  # lm-eval's parser reads sys.argv itself
    cli_evaluate()


if __name__ == "__main__":
    main()
