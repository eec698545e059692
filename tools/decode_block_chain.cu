// Times the DecodeBlock CUDA kernels alone (no onnxruntime): a chain of --layers decode layers at one model's shape,
// each with its own random weights (so that they come from HBM as in a real model, not from L2), the layers' outputs
// feeding the next layer's inputs, captured into one CUDA graph and replayed. Prints the median and spread of
// microseconds per layer over --rounds rounds of --iters replays.
//
// With --head V it also times DecodeHead (the final norm and a [V, d] LM head) alone, and the chain followed by it.
//
// Built with -DMAMBA_CUDA_TIMELINE (kernels/cuda/decode_block.cu then stamps %globaltimer at the fused kernel's phase
// boundaries, per block, into the space past each layer's workspace), it also prints where a layer's time goes: the
// mean over layers of the time from the previous layer's end (its last block past phase C) to the last block past
// each mark, then from mark to mark.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -Ikernels/cuda tools/decode_block_chain.cu kernels/cuda/decode_block.cu \
//        -o /tmp/decode_block_chain [-DMAMBA_CUDA_TIMELINE]
//   /tmp/decode_block_chain [--model 130m|370m|790m|1.4b] [--batch 1] [--layers 24] [--iters 200] [--rounds 7]
//                           [--head 50280]
//
// MAMBA_EXPORT_CUDA_PDL=0 and MAMBA_EXPORT_CUDA_DECODE_BLOCK=split|unfolded choose the path as in the library.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "mamba_cuda.h"

#define CHECK(x)                                                                          \
  do {                                                                                    \
    cudaError_t err_ = (x);                                                               \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "decode_block_chain: %s: %s\n", #x, cudaGetErrorString(err_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

constexpr int kStamps = 16;  // words per block, as the kernel writes them (MAMBA_CUDA_TIMELINE)

struct Shape {
  const char* name;
  int64_t dmodel, layers;
};
const Shape kShapes[] = {{"130m", 768, 24}, {"370m", 1024, 48}, {"790m", 1536, 48}, {"1.4b", 2048, 48}};

uint64_t rng = 88172645463325252ull;
float uniform() {  // [0, 1)
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return static_cast<float>(rng >> 40) / static_cast<float>(1ull << 24);
}

const char* env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : fallback;
}

template <typename T>
T* upload(const std::vector<T>& v) {
  T* d = nullptr;
  CHECK(cudaMalloc(&d, v.size() * sizeof(T)));
  CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
float* floats(size_t n, float lo, float hi) {
  std::vector<float> v(n);
  for (auto& x : v) x = lo + (hi - lo) * uniform();
  return upload(v);
}
__half* halves(size_t n, float scale) {
  std::vector<__half> v(n);
  for (auto& x : v) x = __float2half((2.f * uniform() - 1.f) * scale);
  return upload(v);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "130m";
  int64_t batch = 1, layers = -1, vocab = 0;
  int iters = 200, rounds = 7;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const char* val = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--help" || arg == "-h") {
      std::printf("usage: decode_block_chain [--model 130m|370m|790m|1.4b] [--batch B] [--layers L] [--iters N] "
                  "[--rounds R] [--head V]\n");
      return 0;
    }
    if (val == nullptr) {
      std::fprintf(stderr, "decode_block_chain: %s needs a value\n", arg.c_str());
      return 2;
    }
    if (arg == "--model") model = val;
    else if (arg == "--batch") batch = std::atoll(val);
    else if (arg == "--layers") layers = std::atoll(val);
    else if (arg == "--iters") iters = std::atoi(val);
    else if (arg == "--rounds") rounds = std::atoi(val);
    else if (arg == "--head") vocab = std::atoll(val);
    else {
      std::fprintf(stderr, "decode_block_chain: unknown argument %s\n", arg.c_str());
      return 2;
    }
    ++i;
  }
  const Shape* shape = nullptr;
  for (const auto& s : kShapes) {
    if (model == s.name) shape = &s;
  }
  if (shape == nullptr || batch < 1 || iters < 1 || rounds < 1 || vocab < 0) {
    std::fprintf(stderr, "decode_block_chain: bad --model, --batch, --iters, --rounds or --head\n");
    return 2;
  }
  const int64_t D = shape->dmodel, E = 2 * D, N = 16, K = 4, R = (D + 15) / 16, R2 = R + 2 * N;
  if (layers < 1) layers = shape->layers;
  const size_t ws_bytes = mamba_cuda::decode_block_workspace_bytes(batch, E, N, R);
  const size_t ws_floats = ws_bytes / sizeof(float);
  const int64_t max_blocks = 4096;
  const size_t stamp_words = static_cast<size_t>(max_blocks) * kStamps;

  // Activations: x/residual of layer i are layer i-1's out/residual_out (layer 0's are random).
  std::vector<__half*> act(layers + 1);
  std::vector<float*> res(layers + 1);
  act[0] = halves(batch * D, 1.f);
  res[0] = floats(batch * D, -1.f, 1.f);
  std::vector<mamba_cuda::DecodeBlockArgs> args(layers);
  std::vector<uint64_t*> stamps(layers);
  for (int64_t l = 0; l < layers; ++l) {
    CHECK(cudaMalloc(&act[l + 1], batch * D * sizeof(__half)));
    CHECK(cudaMalloc(&res[l + 1], batch * D * sizeof(float)));
    mamba_cuda::DecodeBlockArgs& a = args[l];
    std::memset(&a, 0, sizeof(a));
    a.batch = batch, a.dim = E, a.dstate = N, a.width = K, a.dt_rank = R;
    a.dtype = mamba_cuda::DType::kFloat16, a.residual_dtype = mamba_cuda::DType::kFloat32;
    a.dmodel = D, a.epsilon = 1e-5f, a.constant_weights = true;
    a.conv_state_in = floats(batch * E * (K - 1), -1.f, 1.f);
    a.ssm_state_in = floats(batch * E * N, -1.f, 1.f);
    a.conv_weight = floats(E * K, -0.5f, 0.5f);
    a.conv_bias = floats(E, -0.1f, 0.1f);
    a.x_proj_weight = floats(R2 * E, -0.05f, 0.05f);
    a.dt_proj_weight = floats(E * R, -0.2f, 0.2f);
    a.dt_bias = floats(E, -4.f, -2.f);
    a.A = floats(E * N, -8.f, -0.5f);
    a.D = floats(E, 0.5f, 1.5f);
    CHECK(cudaMalloc(&a.conv_state_out, batch * E * (K - 1) * sizeof(float)));
    CHECK(cudaMalloc(&a.ssm_state_out, batch * E * N * sizeof(float)));
    float* ws = nullptr;
    CHECK(cudaMalloc(&ws, (ws_floats + 2 * stamp_words + 4) * sizeof(float)));
    CHECK(cudaMemset(ws, 0, (ws_floats + 2 * stamp_words + 4) * sizeof(float)));
    a.workspace = ws;
    stamps[l] = reinterpret_cast<uint64_t*>(ws + (ws_floats + 3) / 4 * 4);
    a.x = act[l], a.residual = res[l];
    a.norm_weight = halves(D, 1.f);
    a.in_proj_weight = halves(2 * E * D, 0.04f);
    a.out_proj_weight = halves(D * E, 0.03f);
    a.out = act[l + 1], a.residual_out = res[l + 1];
  }

  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  // Microseconds per replay of a CUDA graph of what `enqueue` launches, over `rounds` rounds of `iters` replays,
  // sorted (after a run without a graph and 20 replays to warm up).
  const auto time_graph = [&](const auto& enqueue) {
    enqueue();
    CHECK(cudaStreamSynchronize(stream));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    enqueue();
    CHECK(cudaStreamEndCapture(stream, &graph));
    CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 20; ++i) CHECK(cudaGraphLaunch(exec, stream));
    CHECK(cudaStreamSynchronize(stream));
    std::vector<double> us;
    for (int r = 0; r < rounds; ++r) {
      CHECK(cudaEventRecord(start, stream));
      for (int i = 0; i < iters; ++i) CHECK(cudaGraphLaunch(exec, stream));
      CHECK(cudaEventRecord(stop, stream));
      CHECK(cudaEventSynchronize(stop));
      float ms = 0.f;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      us.push_back(1000.0 * ms / iters);
    }
    CHECK(cudaGraphExecDestroy(exec));
    CHECK(cudaGraphDestroy(graph));
    std::sort(us.begin(), us.end());
    return us;
  };
  const auto chain = [&] {
    for (int64_t l = 0; l < layers; ++l) CHECK(mamba_cuda::decode_block(args[l], stream));
  };
  std::vector<double> sorted = time_graph(chain);
  for (auto& v : sorted) v /= static_cast<double>(layers);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, model %s (d %lld, e %lld), batch %lld, %lld layers, pdl %s, path %s\n", prop.name, model.c_str(),
              static_cast<long long>(D), static_cast<long long>(E), static_cast<long long>(batch),
              static_cast<long long>(layers), env_or("MAMBA_EXPORT_CUDA_PDL", "default"),
              env_or("MAMBA_EXPORT_CUDA_DECODE_BLOCK", "default"));
  std::printf("us per layer: median %.3f  min %.3f  max %.3f  (%d rounds of %d graph replays)\n",
              sorted[sorted.size() / 2], sorted.front(), sorted.back(), rounds, iters);
  if (vocab > 0) {
    // DecodeHead on the last layer's output: alone, then after the chain (the early start's overlap included).
    mamba_cuda::DecodeHeadArgs h{};
    h.dtype = mamba_cuda::DType::kFloat16, h.residual_dtype = mamba_cuda::DType::kFloat32;
    h.batch = batch, h.dmodel = D, h.vocab = vocab, h.epsilon = 1e-5f, h.constant_weights = true;
    h.x = act[layers], h.residual = res[layers];
    h.norm_weight = halves(D, 1.f);
    h.weight = halves(vocab * D, 0.04f);
    CHECK(cudaMalloc(&h.logits, batch * vocab * sizeof(__half)));
    const auto head = [&] { CHECK(mamba_cuda::decode_head(h, stream)); };
    const std::vector<double> alone = time_graph(head);
    const std::vector<double> both = time_graph([&] { chain(), head(); });
    const double bytes = static_cast<double>(vocab) * D * sizeof(__half);
    std::printf("head (V %lld): alone median %.3f us [%.3f, %.3f] (%.0f GB/s of its weights); chain + head %.3f us "
                "[%.3f, %.3f], %.3f more than the chain\n", static_cast<long long>(vocab), alone[alone.size() / 2],
                alone.front(), alone.back(), bytes / alone[alone.size() / 2] / 1e3, both[both.size() / 2], both.front(),
                both.back(), both[both.size() / 2] - sorted[sorted.size() / 2] * static_cast<double>(layers));
  }

#ifdef MAMBA_CUDA_TIMELINE
  // Stamps of the last replay, per block (decode_block.cu's stamp() calls; read before the split kernels below, whose
  // phase-A and phase-B kernels stamp too). A mark no block reached stays 0. Each layer's marks are timed from the
  // previous layer's end (its last block past "phase C done"): the first reached mark from there, each later one from
  // the last block past the mark before it.
  {
    const char* marks[] = {"start", "pdl_wait done", "norm done", "in_proj done", "conv done", "phase A done",
                           "barrier 1 passed", "partials staged", "dbc summed", "phase B done", "barrier 2 passed",
                           "phase C done"};
    const int order[] = {0, 1, 2, 3, 4, 5, 6, 11, 7, 8, 9, 10};  // the stamp index of each mark
    constexpr int kMarks = 12;
    double sum[kMarks] = {0}, lead = 0;
    int64_t seen[kMarks] = {0};
    uint64_t prev_end = 0;
    int64_t counted = 0;
    // DECODE_CHAIN_BLOCKS=1: each block's mean time (us from the previous layer's end) at each mark, over the layers.
    const bool per_block = std::strcmp(env_or("DECODE_CHAIN_BLOCKS", "0"), "1") == 0;
    std::vector<double> at(static_cast<size_t>(max_blocks) * kMarks, 0.0);
    for (int64_t l = 0; l < layers; ++l) {
      std::vector<uint64_t> st(stamp_words);
      CHECK(cudaMemcpy(st.data(), stamps[l], stamp_words * sizeof(uint64_t), cudaMemcpyDeviceToHost));
      uint64_t first = UINT64_MAX, last[kMarks] = {0};
      for (int64_t b = 0; b < max_blocks; ++b) {
        if (st[b * kStamps] == 0) continue;
        first = std::min(first, st[b * kStamps]);
        for (int k = 0; k < kMarks; ++k) last[k] = std::max(last[k], st[b * kStamps + order[k]]);
      }
      if (first == UINT64_MAX || last[kMarks - 1] == 0) continue;
      if (prev_end != 0) {
        for (int64_t b = 0; b < max_blocks; ++b) {
          for (int k = 0; k < kMarks; ++k) {
            const uint64_t t = st[b * kStamps + order[k]];
            if (t != 0) at[b * kMarks + k] += static_cast<double>(static_cast<int64_t>(t - prev_end));
          }
        }
        uint64_t prev = prev_end;
        for (int k = 1; k < kMarks; ++k) {
          if (last[k] == 0) continue;
          sum[k] += static_cast<double>(static_cast<int64_t>(last[k]) - static_cast<int64_t>(prev));
          ++seen[k];
          prev = last[k];
        }
        lead += static_cast<double>(static_cast<int64_t>(prev_end) - static_cast<int64_t>(first));
        ++counted;
      }
      prev_end = last[kMarks - 1];
    }
    if (counted == 0) {
      std::printf("timeline: no stamps (not the fused kernel?)\n");
    } else {
      std::printf("timeline (us, mean over %lld layers; from the previous layer's end, then mark to mark):\n",
                  static_cast<long long>(counted));
      double total = 0;
      for (int k = 1; k < kMarks; ++k) {
        if (seen[k] == 0) continue;
        std::printf("  -> %-22s %7.3f\n", marks[k], sum[k] / seen[k] / 1000.0);
        total += sum[k] / seen[k] / 1000.0;
      }
      std::printf("  %-25s %7.3f\n", "layer (sum)", total);
      std::printf("  %-25s %7.3f\n", "first block started early", lead / counted / 1000.0);
      if (per_block) {
        std::printf("per block (us from the previous layer's end, mean over layers):\nblock");
        for (int k = 0; k < kMarks; ++k) std::printf(" | %s", marks[k]);
        std::printf("\n");
        for (int64_t b = 0; b < max_blocks; ++b) {
          if (at[b * kMarks] == 0.0) continue;  // no stamps: not a block of the kernel
          std::printf("%lld", static_cast<long long>(b));
          for (int k = 0; k < kMarks; ++k) std::printf(" %.2f", at[b * kMarks + k] / counted / 1000.0);
          std::printf("\n");
        }
      }
    }
  }
#endif

  // The chain's outputs and states must not depend on the path: run it once more as split kernels and compare bits.
  {
    const auto snapshot = [&] {
      std::vector<char> bytes;
      const auto add = [&](const void* p, size_t n) {
        const size_t at = bytes.size();
        bytes.resize(at + n);
        CHECK(cudaMemcpy(bytes.data() + at, p, n, cudaMemcpyDeviceToHost));
      };
      for (int64_t l = 0; l < layers; ++l) {
        add(args[l].out, batch * D * sizeof(__half));
        add(args[l].residual_out, batch * D * sizeof(float));
        add(args[l].conv_state_out, batch * E * (K - 1) * sizeof(float));
        add(args[l].ssm_state_out, batch * E * N * sizeof(float));
      }
      return bytes;
    };
    const std::vector<char> graph_run = snapshot();
    const char* forced = std::getenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK");
    const std::string saved = forced ? forced : "";
    setenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", "split", 1);
    for (int64_t l = 0; l < layers; ++l) CHECK(mamba_cuda::decode_block(args[l], stream));
    CHECK(cudaStreamSynchronize(stream));
    const std::vector<char> split_run = snapshot();
    if (forced) setenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK", saved.c_str(), 1);
    else unsetenv("MAMBA_EXPORT_CUDA_DECODE_BLOCK");
    const bool same = graph_run == split_run;
    std::printf("outputs and states vs the split kernels: %s\n", same ? "identical" : "DIFFERENT");
    if (!same) return 1;
  }

  return 0;
}
