"""One module per `lmtrain` subcommand (besides `train`); each defines `register(subparsers)`."""
