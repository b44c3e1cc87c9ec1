#pragma once
// Marks functions usable from host and device code when compiled by nvcc.

#if defined(__CUDACC__)
#define RA_HD __host__ __device__ __forceinline__
#else
#define RA_HD inline
#endif
