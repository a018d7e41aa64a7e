// Host/device qualifiers shared by the CPU and CUDA code.
//
// Functions in csrc/common/ are written once and compiled twice: by the host C++
// compiler for the CPU loops and by nvcc for the CUDA kernels. GFN_HOST_DEVICE
// expands to `__host__ __device__` under nvcc and to nothing for the host compiler.
#pragma once

#if defined(__CUDACC__)
#define GFN_HOST_DEVICE __host__ __device__
#else
#define GFN_HOST_DEVICE
#endif

// Every shared helper is `GFN_HD`: inline, and callable from both sides.
#define GFN_HD GFN_HOST_DEVICE inline
