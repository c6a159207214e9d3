"""`python -m examples.news_demo [flags]`, from the repository root (what `make demo` runs)."""

from examples.news_demo.cli import main

raise SystemExit(main())
