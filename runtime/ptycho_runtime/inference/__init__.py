"""A loaded bundle and the inference API: ``Bundle``/``load_bundle``, backends, parity, streaming, host checks.

``bundle`` is the centre: it reads a bundle through ``format``, starts a
backend (ONNX Runtime, TorchScript, or a Triton server through
``triton_backend``), self-tests it on the stored parity cases, and predicts
and stitches through ``reconstruction``. ``streaming`` feeds it live frames,
``compatibility`` checks a host's instrument against the one it was trained
for, ``remote_errors`` are the errors of the remote backends.
"""
