"""Triton kernels of fourbit (installed as fourbit.kernels).

Only @triton.jit kernels and their autotune configs live here: no launchers, no
torch.library, no imports from the fourbit package. The launchers are in python/fourbit/.
"""
