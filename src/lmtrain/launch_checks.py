"""What torchrun's environment says about the launch, read before torch loads: warnings for a
launch that will not do what its user wants."""

from __future__ import annotations

import os
from collections.abc import Mapping

#: torchrun's variables in each worker: restarts allowed, and whether the workers share the
#: rendezvous's own store
MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
#: The variable that gives each attempt's workers a store of their own
OWN_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def elastic_restart_warning(environ: Mapping[str, str] | None = None) -> str | None:
    """A warning when torchrun may restart the workers (``--max-restarts`` above 0) while they
    share the rendezvous's store: there torch 2.13's restarted workers find the dead attempt's
    gloo addresses and fail to connect (4 restarts in 5 here), using up the restarts."""
    environ = os.environ if environ is None else environ
    try:
        restarts = int(environ.get(MAX_RESTARTS, "0") or 0)
    except ValueError:
        return None
    if restarts <= 0 or environ.get(AGENT_STORE, "").lower() != "true":
        return None
    return (f"torchrun may restart these workers (--max-restarts={restarts}), but they share "
            f"the rendezvous's store, where a dead worker's address stays behind and restarts "
            f"often fail to connect; export {OWN_STORE}=1 before torchrun (see "
            f"docs/distributed.md, elastic restarts)")
