// embedding kernels: pending
