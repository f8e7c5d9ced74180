// loss kernels: pending
