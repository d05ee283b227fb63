// The Python module of the host build (tests/cuda_host.py): the test controls of
// host/runtime.h. Its ops are torch.ops.pconv_cuda_host.*, registered by the op code.
#include "runtime.h"

#include <c10/util/Flags.h>
#include <torch/extension.h>

#include <tuple>

// c10's CPU allocator fills each new allocation with a junk pattern (NaN for floats) when
// this is set: a kernel that leaves part of an output unwritten then shows it.
C10_DECLARE_bool(caffe2_cpu_allocator_do_junk_fill);

namespace {

using Record = std::tuple<std::string, std::tuple<unsigned, unsigned, unsigned>,
                          std::tuple<unsigned, unsigned, unsigned>, size_t>;

std::vector<Record> take_launch_log() {
  std::vector<Record> out;
  for (const auto& r : pconv::cuda::host::take_launch_log()) {
    out.emplace_back(r.kernel, std::make_tuple(r.grid[0], r.grid[1], r.grid[2]),
                     std::make_tuple(r.block[0], r.block[1], r.block[2]), r.smem);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Host build of pconv's CUDA sources: test controls of its runtime.";
  m.def("set_multiprocessor_count", &pconv::cuda::host::set_multiprocessor_count,
        "The multiprocessor count the launchers size their grids from.");
  m.def("set_compute_capability", &pconv::cuda::host::set_compute_capability,
        "The compute capability (10 * major + minor) the launchers pick kernels by.");
  m.def("set_reverse_schedule", &pconv::cuda::host::set_reverse_schedule,
        "Run the threads of a block in reverse linear order between barriers.");
  m.def("take_launch_log", &take_launch_log,
        "The launches since the last call: (kernel, grid, block, dynamic shared bytes).");
  m.def(
      "set_junk_fill", [](bool on) { FLAGS_caffe2_cpu_allocator_do_junk_fill = on; },
      "Fill every new CPU allocation with a junk pattern (NaN for floating point), so that "
      "output left unwritten by a kernel does not read as zeros.");
}
