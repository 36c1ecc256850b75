"""``python -m analyses.axioms``: run the study (see :mod:`analyses.axioms`)."""

from analyses.axioms.study import main

if __name__ == "__main__":
    raise SystemExit(main())
