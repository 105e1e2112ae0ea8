"""Fused GPU kernels for the ops in ``models``.

``lif_triton`` is the Triton implementation of the LIF neuron op; importing it registers it with
the neuron dispatch (``models.dispatch.register_neuron_impl``) under the name ``"triton"``, for
CUDA inputs. Without Triton installed nothing is registered and the PyTorch reference serves
every call; a Triton that is installed but fails to import is an error, not a silent fallback.
"""

try:
    import triton  # noqa: F401
except ImportError:  # CPU-only installs: the reference takes every call
    triton = None

if triton is not None:
    from models.kernels import lif_triton  # noqa: F401  (registers the "triton" neuron impl)
