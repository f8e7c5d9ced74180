// matmul kernels: pending
