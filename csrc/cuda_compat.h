// What the CUDA sources take from the CUDA toolkit and from c10's CUDA layer, in one place,
// so that the very same .cu files also compile for the CPU under the emulation of the CUDA
// execution model (cuda_emulation.h, selected by -DVQUANT_CUDA_EMULATION).
//   VQ_LAUNCH(kernel, grid, block, stream)(args...)   kernel<<<grid, block, 0, stream>>>(args...)
//   VQ_DEVICE_CHECK(t, what)                          t is on the device the build runs kernels on
//   VQ_DEVICE_GUARD(t), VQ_STREAM, VQ_LAUNCH_CHECK()  device guard, current stream, launch error check
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#ifdef VQUANT_CUDA_EMULATION
#include "cuda_emulation.h"
#define VQ_DEVICE_CHECK(t, what) \
  TORCH_CHECK((t).device().is_cpu(), what " must be a CPU tensor (CUDA emulation), got ", (t).device())
#define VQ_DEVICE_GUARD(t) ((void)0)
#define VQ_STREAM 0
#define VQ_LAUNCH(kernel, grid, block, stream) ((void)(stream), ::vquant_emu::launch((kernel), (grid), (block)))
#define VQ_LAUNCH_CHECK() ((void)0)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define VQ_DEVICE_CHECK(t, what) TORCH_CHECK((t).is_cuda(), what " must be a CUDA tensor, got ", (t).device())
#define VQ_DEVICE_GUARD(t) const c10::cuda::CUDAGuard vq_device_guard((t).device())
#define VQ_STREAM c10::cuda::getCurrentCUDAStream()
#define VQ_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#define VQ_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif
