from gemma4lab.cli import main

raise SystemExit(main())
