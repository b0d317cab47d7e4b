"""Every PEFT method, one file each. Importing this package registers them all."""

from vpeft.methods import (  # noqa: F401  (imported for registration)
    adapter,
    adapter_plus,
    adaptformer,
    bapat,
    bitfit,
    convpass,
    dora,
    dtl,
    e2vpt,
    fact,
    full,
    glora,
    gps,
    hst,
    hydra,
    last,
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
    snf,
    spt,
    ssf,
    utuning,
    vfpt,
    vpt,
)
from vpeft.methods.base import Method, MethodConfig, get_method, register, registered_methods

__all__ = ["Method", "MethodConfig", "get_method", "register", "registered_methods"]
