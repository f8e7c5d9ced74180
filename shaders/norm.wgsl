// norm kernels: pending
