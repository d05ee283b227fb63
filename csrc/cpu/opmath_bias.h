// The bias as the CPU epilogues read it.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <vector>

namespace pconv {

// bias [C_out] (any strides, in scalar_t) as opmath values, one per output channel; empty
// when the bias is undefined.
template <typename scalar_t>
std::vector<at::opmath_type<scalar_t>> opmath_bias(const at::Tensor& bias) {
  std::vector<at::opmath_type<scalar_t>> values;
  if (!bias.defined()) return values;
  const at::Tensor b = bias.contiguous();
  const scalar_t* p = b.const_data_ptr<scalar_t>();
  values.assign(p, p + b.numel());
  return values;
}

}  // namespace pconv
