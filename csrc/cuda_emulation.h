// A small emulation of the CUDA execution model on the CPU, so that the CUDA kernels of
// csrc/*.cu run (and are checked bit for bit) on machines without a GPU. Included by
// cuda_compat.h when VQUANT_CUDA_EMULATION is defined; host code only, g++/clang.
//
// - A launch runs every block of the grid; blocks are spread over the CPU threads of ATen's
//   parallel_for (in no promised order, as on a GPU).
// - The threads of a block are user-level fibers on one CPU thread, each with its own stack.
//   __syncthreads() is a real barrier: a fiber that reaches it is suspended until every live
//   thread of its block has reached it (threads that returned no longer count, as on current
//   GPUs). Between two barriers the fibers run one after the other, in ascending thread order
//   after even barriers and in descending order after odd ones, so that a missing barrier
//   (a thread reading what another writes in the same phase) shows up as a wrong result.
// - __shared__ variables are static thread_local: one copy per CPU thread, which runs one
//   block at a time, so one copy per running block, shared by the block's threads only.
//   Like shared memory, a block finds whatever the previous block left there.
// - threadIdx, blockIdx, blockDim, gridDim are per fiber / per block (x only: 1-D launches).
// - Arithmetic intrinsics are plain IEEE float operations (build with -ffp-contract=off,
//   as the device build uses --fmad=false).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static thread_local

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

#if defined(__x86_64__)
// Save the callee-saved registers and the stack pointer of the running context in *save,
// continue the context whose stack pointer is `next` (System V x86-64 ABI).
asm(R"(
  .text
  .weak vq_emu_switch
  .hidden vq_emu_switch
  .type vq_emu_switch, @function
vq_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size vq_emu_switch, .-vq_emu_switch
)");
extern "C" void vq_emu_switch(void** save, void* next);
#endif

namespace vquant_emu {

inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

// The fibers of the block that runs on this CPU thread.
class Block {
 public:
  static constexpr std::size_t kStack = 64 * 1024;

  void run(unsigned threads, const std::function<void()>& body) {
    body_ = &body;
    while (stacks_.size() < threads) stacks_.emplace_back(new char[kStack]);
    ctx_.assign(threads, Context{});
    done_.assign(threads, 0);
    for (unsigned t = 0; t < threads; ++t) start(t);
    threads_ = threads;
    live_ = threads;
    phase_ = 0;
    pos_ = -1;
    const int first = next();
    current_ = static_cast<unsigned>(first);
    thread_idx = dim3(current_);
    switch_to(&main_, current_);  // back here when every thread has returned
  }

  // __syncthreads(): suspend until every live thread of the block has arrived.
  void barrier() {
    const unsigned self = current_;
    const int other = next();
    if (other == static_cast<int>(self)) return;  // the only live thread
    current_ = static_cast<unsigned>(other);
    thread_idx = dim3(current_);
    switch_to(&ctx_[self], current_);
  }

 private:
#if defined(__x86_64__)
  struct Context {
    void* sp = nullptr;
  };
  void start(unsigned t) {
    auto top = reinterpret_cast<std::uintptr_t>(stacks_[t].get() + kStack) & ~std::uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top - 64);  // 6 registers, entry address, fake return address
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[6] = reinterpret_cast<void*>(&Block::entry);
    sp[7] = nullptr;
    ctx_[t].sp = sp;
  }
  void switch_to(Context* save, unsigned t) { vq_emu_switch(&save->sp, ctx_[t].sp); }
  void switch_to_main(Context* save) { vq_emu_switch(&save->sp, main_.sp); }
#else
  struct Context {
    ucontext_t uc;
  };
  void start(unsigned t) {
    getcontext(&ctx_[t].uc);
    ctx_[t].uc.uc_stack.ss_sp = stacks_[t].get();
    ctx_[t].uc.uc_stack.ss_size = kStack;
    ctx_[t].uc.uc_link = nullptr;
    makecontext(&ctx_[t].uc, &Block::entry, 0);
  }
  void switch_to(Context* save, unsigned t) { swapcontext(&save->uc, &ctx_[t].uc); }
  void switch_to_main(Context* save) { swapcontext(&save->uc, &main_.uc); }
#endif

  static void entry();

  // The next live thread: the rest of this phase in its order, then the next phase (the
  // threads waiting at the barrier) in the opposite order; -1 when every thread returned.
  int next() {
    if (live_ == 0) return -1;
    for (;;) {
      if (++pos_ == static_cast<int>(threads_)) {
        pos_ = 0;
        ++phase_;
      }
      const unsigned t = phase_ % 2 == 0 ? pos_ : threads_ - 1 - pos_;
      if (!done_[t]) return static_cast<int>(t);
    }
  }

  std::vector<std::unique_ptr<char[]>> stacks_;
  std::vector<Context> ctx_;
  std::vector<char> done_;
  Context main_;
  unsigned current_ = 0, threads_ = 0, live_ = 0, phase_ = 0;
  int pos_ = -1;
  const std::function<void()>* body_ = nullptr;
};

inline thread_local Block block;

inline void Block::entry() {
  Block& b = block;
  (*b.body_)();
  const unsigned self = b.current_;
  b.done_[self] = 1;
  --b.live_;
  const int other = b.next();
  if (other < 0) {
    b.switch_to_main(&b.ctx_[self]);  // never resumed
  } else {
    b.current_ = static_cast<unsigned>(other);
    thread_idx = dim3(b.current_);
    b.switch_to(&b.ctx_[self], b.current_);
  }
  std::abort();
}

// kernel<<<grid, block>>>(args...): the arguments are converted to the kernel's parameter
// types once, as the CUDA runtime copies them, then every block runs to completion.
template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, threads;

  template <typename... A>
  void operator()(A&&... args) const {
    TORCH_CHECK(grid.y == 1 && grid.z == 1 && threads.y == 1 && threads.z == 1,
                "CUDA emulation: only 1-D launches are emulated");
    TORCH_CHECK(grid.x >= 1, "CUDA emulation: invalid configuration argument (empty grid)");
    TORCH_CHECK(threads.x >= 1 && threads.x <= 1024, "CUDA emulation: invalid block size ", threads.x);
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const auto kernel_fn = kernel;
    const dim3 g = grid, t = threads;
    at::parallel_for(0, static_cast<int64_t>(g.x), 1, [&](int64_t begin, int64_t end) {
      const std::function<void()> body = [&] { std::apply(kernel_fn, params); };
      for (int64_t b = begin; b < end; ++b) {
        block_idx = dim3(static_cast<unsigned int>(b));
        block_dim = t;
        grid_dim = g;
        block.run(t.x, body);
      }
    });
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 threads) {
  return Launch<P...>{kernel, grid, threads};
}

}  // namespace vquant_emu

#define threadIdx (::vquant_emu::thread_idx)
#define blockIdx (::vquant_emu::block_idx)
#define blockDim (::vquant_emu::block_dim)
#define gridDim (::vquant_emu::grid_dim)

inline void __syncthreads() { ::vquant_emu::block.barrier(); }
