"""Inference beyond one process: a Triton model repository and server, and many scans on a Dask cluster.

``triton_repository`` (``ptycho-runtime triton-repo``), ``serve``
(``ptycho-runtime serve``, PyTriton) and ``infer_many`` (``ptycho-runtime
infer-many``). Their optional packages (tritonclient, PyTriton, Dask) are
imported only when used. The Triton *client* is an inference backend
(``inference.triton_backend``), so ``load_bundle(backend="triton")`` needs
nothing from here.
"""
