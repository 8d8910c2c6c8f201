"""Drop-in call forms of other fused cross-entropy libraries, on this package's ops.

    from nitp_kernels.compat.liger import LigerFusedLinearCrossEntropyLoss, liger_fused_linear_cross_entropy
    from nitp_kernels.compat.cce import linear_cross_entropy

Each keeps its library's argument names, order, defaults and return forms; an option we do not implement is
accepted only at a value that means "off" (or that computes what we compute) and refused by name otherwise.
Neither module imports the library it stands in for.
"""
