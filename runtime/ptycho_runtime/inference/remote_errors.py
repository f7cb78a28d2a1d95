"""The errors of the runtime's remote paths: a Triton server, a Dask cluster.

Why a family of its own: a bundle that fails to load is the file's fault
(``BundleError``, a ValueError); a server that is down, goes away mid-scan,
times out or serves another model is the deployment's, and the host reacts
differently (retry later, point at another server, redeploy). Every message
names the server or cluster, what went wrong and what to do about it. The
``ptycho-runtime`` command exits 3 on any of them.
"""

from __future__ import annotations

from typing import Optional


class RemoteError(RuntimeError):
    """A remote inference server or compute cluster failed, could not be reached, or refused the work.

    ``where`` names the server (``host:port``, model) or scheduler address.
    """

    def __init__(self, message: str, where: Optional[str] = None) -> None:
        super().__init__(message)
        self.where = where


class ServerUnavailableError(RemoteError):
    """No answer from the server: not running, unreachable, went away mid-scan, or timed out.

    Raised only after the bounded retries are spent; no partial result is ever returned with it.
    """


class ServerModelMismatchError(RemoteError):
    """The server answers, but its model is not this bundle's (name, dims, dtypes or sha256 differ)."""


class ClusterError(RemoteError):
    """The Dask scheduler cannot be reached or the cluster cannot run the bundle (e.g. workers lack the file)."""
