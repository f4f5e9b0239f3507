from inference_pio.cli import main

raise SystemExit(main())
