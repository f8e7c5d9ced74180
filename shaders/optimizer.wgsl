// optimizer kernels: pending
