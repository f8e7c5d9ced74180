// attention kernels: pending
