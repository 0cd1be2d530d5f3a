// Kernels whose memory access patterns are known by construction, for the profile build's
// planted-pattern tests (tests/test_access_profile.py). One warp per block unless a test says
// otherwise. The test finds each access's line by the tag in its trailing comment. Not shipped.

// Lane l stores and loads word l of a tile and reads and writes float l of global memory:
// 4-byte accesses to consecutive words and addresses, so 1 wavefront and 4 sectors per request,
// every sector used in full.
extern "C" __global__ void coalesced_copy(const float* in, float* out) {
    __shared__ float tile[64];  // blocks of up to 64 threads
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = in[i];  // tag: copy store
    __syncthreads();
    out[i] = tile[threadIdx.x];  // tag: copy load
}

// Lane l reads word 2l: lanes l and l + 16 want different words of bank 2l % 32, a 2-way conflict.
extern "C" __global__ void stride_two_read(const float* in, float* out) {
    __shared__ float tile[64];
    tile[threadIdx.x] = in[threadIdx.x];
    tile[threadIdx.x + 32] = in[threadIdx.x + 32];
    __syncthreads();
    out[threadIdx.x] = tile[2 * threadIdx.x];  // tag: stride-two load
}

// Every lane reads the same word (its index computed, as a kernel's would be): one broadcast.
extern "C" __global__ void broadcast_read(const float* in, float* out) {
    __shared__ float tile[32];
    tile[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x / 32];  // tag: broadcast load
}

// 8- and 16-byte accesses: a float2 per lane takes two half-warp phases, a float4 four
// quarter-warp phases; float4 l and l + 4 of the 32-byte strided read share banks, 2-way. Each
// quarter-warp reading the same 128 bytes still takes its own phase: 4 wavefronts, not 1.
extern "C" __global__ void wide_reads(const float* in, float* out) {
    __shared__ float4 tile4[64];
    __shared__ float2 tile2[32];
    const float4* in4 = reinterpret_cast<const float4*>(in);
    tile4[threadIdx.x] = in4[threadIdx.x];
    tile4[threadIdx.x + 32] = in4[threadIdx.x + 32];
    tile2[threadIdx.x] = make_float2(in[threadIdx.x], in[threadIdx.x + 1]);
    __syncthreads();
    const float2 pair = tile2[threadIdx.x];  // tag: float2 load
    const float4 quad = tile4[threadIdx.x];  // tag: float4 load
    const float4 strided = tile4[2 * threadIdx.x];  // tag: strided float4 load
    const float4 repeated = tile4[threadIdx.x % 8];  // tag: repeated float4 load
    out[threadIdx.x] = pair.x + quad.y + strided.z + repeated.w;
}

// Lane l reads float 32 l: a sector per lane, 4 of its 32 bytes used.
extern "C" __global__ void strided_global_read(const float* in, float* out) {
    out[threadIdx.x] = in[32 * threadIdx.x];  // tag: strided global load
}

// The stride-two pattern in dynamic shared memory.
extern "C" __global__ void dynamic_stride_two_read(const float* in, float* out) {
    extern __shared__ float buffer[];
    buffer[threadIdx.x] = in[threadIdx.x];
    buffer[threadIdx.x + 32] = in[threadIdx.x + 32];
    __syncthreads();
    out[threadIdx.x] = buffer[2 * threadIdx.x];  // tag: dynamic stride-two load
}

// Every lane reads all of in[0 .. n): n floats read however often, n floats written once.
extern "C" __global__ void sum_all(const float* in, float* out, int n) {
    float total = 0.0f;
    for (int j = 0; j < n; ++j) total += in[j];
    out[blockIdx.x * blockDim.x + threadIdx.x] = total;
}
