// Host-side launchers of the CUDA partial-convolution kernels (declarations).
//
// Each launcher takes a parameter struct (params.cuh) that the op code
// (partial_conv2d_kernel.cu) fills from tensors, picks a kernel instantiation and a launch
// shape, launches on the given stream (the current stream of the current device) and
// checks the launch. They are explicitly instantiated for float, double, c10::Half and
// c10::BFloat16 (implicit_gemm.cu: the 16-bit dtypes only) in mask_ratio.cu,
// masked_input.cu, epilogue.cu, grad_prologue.cu, few_outputs.cu and implicit_gemm.cu,
// which include no ATen header: those files compile quickly and in parallel, and the one
// file that includes ATen has no device code.
#pragma once

#include "params.cuh"

namespace pconv {
namespace cuda {

// The mask pass (mask_ratio_kernel.cuh). Sets the launch-shape fields of p itself.
template <typename scalar_t>
void launch_mask_ratio(MaskRatioParams<scalar_t, acc_type<scalar_t>> p, cudaStream_t stream);

// x * m and the mask's channel sum in one pass (masked_input_kernel.cuh).
template <typename scalar_t>
void launch_masked_input(const MaskedInputParams<scalar_t, acc_type<scalar_t>>& p,
                         cudaStream_t stream);

// The forward epilogue, in place (elementwise_kernel.cuh).
template <typename scalar_t>
void launch_epilogue(const EpilogueParams<scalar_t, acc_type<scalar_t>>& p, cudaStream_t stream);

// Sets the launch plan of the backward prologue (vec, chunks, num_partials = K), so that
// the caller can allocate partials [C, K] before launch_grad_prologue.
template <typename scalar_t>
void plan_grad_prologue(GradPrologueParams<scalar_t, acc_type<scalar_t>>& p);

// The backward prologue: g_raw and the per-block bias-gradient partials.
template <typename scalar_t>
void launch_grad_prologue(const GradPrologueParams<scalar_t, acc_type<scalar_t>>& p,
                          cudaStream_t stream);

// The bias gradient from the partials, in a fixed order.
template <typename scalar_t>
void launch_bias_grad_finalize(const BiasGradParams<scalar_t, acc_type<scalar_t>>& p,
                               cudaStream_t stream);

// The direct forward of a layer with few output channels (few_outputs_kernel.cuh); sets
// p.conv.chunk_channels itself.
template <typename scalar_t>
void launch_few_outputs_forward(FewOutputsForwardParams<scalar_t, acc_type<scalar_t>> p,
                                cudaStream_t stream);

// The direct input gradient of a layer with few output channels, masked.
template <typename scalar_t>
void launch_few_outputs_input_grad(FewOutputsInputGradParams<scalar_t, acc_type<scalar_t>> p,
                                   cudaStream_t stream);

// The implicit-GEMM forward and input gradient of a 3x3 unit-stride layer on tensor cores
// (implicit_gemm_kernel.cuh): bfloat16 and float16 on compute capability 8.0 and later.
template <typename scalar_t>
void launch_implicit_gemm_forward(const ImplicitGemmParams<scalar_t>& p, cudaStream_t stream);
template <typename scalar_t>
void launch_implicit_gemm_input_grad(const ImplicitGemmParams<scalar_t>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace pconv
