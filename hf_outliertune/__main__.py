"""`python -m hf_outliertune`: the `hf-outliertune` command line."""

from .cli import main

raise SystemExit(main())
