// reduce kernels: pending
