"""Every PEFT method, one file each. Importing this package registers them all."""

from vpeft.methods import (  # noqa: F401  (imported for registration)
    adapter,
    adaptformer,
    bitfit,
    convpass,
    dora,
    fact,
    full,
    gps,
    linear,
    ln_tune,
    lora,
    lst,
    mona,
    noah,
    partial_k,
    prefix,
    repadapter,
    sct,
    spt,
    ssf,
    vpt,
)
from vpeft.methods.base import Method, MethodConfig, get_method, register, registered_methods

__all__ = ["Method", "MethodConfig", "get_method", "register", "registered_methods"]
