"""`python -m feather_grpc.cli serve ...`: the workers, the tests and bench/ start the gateway this way."""

from feather_grpc.cli import main

raise SystemExit(main())
