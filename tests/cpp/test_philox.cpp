// ctest suite for csrc/philox.h (docs/perturbation-stream.md, stream v1).
// Usage: test_philox <kat|mapping|rademacher|mask|uniforms|gaussian>
#include "philox.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "check.h"  // CHECK, failures()

using zf::Words4;

// Plain reading of §1, independent of the header's implementation.
static Words4 philox_ref(uint32_t c[4], uint32_t k0, uint32_t k1) {
  uint32_t x0 = c[0], x1 = c[1], x2 = c[2], x3 = c[3];
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = (uint64_t)0xD2511F53u * x0, p1 = (uint64_t)0xCD9E8D57u * x2;
    uint32_t n0 = (uint32_t)(p1 >> 32) ^ x1 ^ k0, n1 = (uint32_t)p1;
    uint32_t n2 = (uint32_t)(p0 >> 32) ^ x3 ^ k1, n3 = (uint32_t)p0;
    x0 = n0; x1 = n1; x2 = n2; x3 = n3;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return Words4{x0, x1, x2, x3};
}

static void test_kat() {
  struct V { uint32_t c[4]; uint32_t k[2]; uint32_t out[4]; };
  const V vs[3] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const V& v : vs) {
    Words4 w = zf::philox4x32_10(v.c[0], v.c[1], v.c[2], v.c[3], v.k[0], v.k[1]);
    CHECK(w.x0 == v.out[0] && w.x1 == v.out[1] && w.x2 == v.out[2] && w.x3 == v.out[3],
          "got %08x %08x %08x %08x", w.x0, w.x1, w.x2, w.x3);
  }
}

static void test_mapping() {
  const uint64_t seed = 0x123456789abcdefULL;
  const uint32_t k0 = zf::seed_k0(seed), k1 = zf::seed_k1(seed);
  CHECK(k0 == 0x89abcdefu && k1 == 0x01234567u, "key split %08x %08x", k0, k1);
  // counter = (b mod 2^32, b >> 32, tensor_id, tag)
  const uint64_t bs[] = {0, 1, 0xffffffffULL, 0x100000000ULL, 0x123456789ULL};
  for (uint64_t b : bs) {
    for (uint32_t tid : {0u, 7u, 0xffffffffu}) {
      for (uint32_t tag : {0u, 1u, 2u}) {
        uint32_t c[4] = {(uint32_t)b, (uint32_t)(b >> 32), tid, tag};
        Words4 a = zf::stream_block(b, tid, tag, k0, k1), r = philox_ref(c, k0, k1);
        CHECK(a.x0 == r.x0 && a.x1 == r.x1 && a.x2 == r.x2 && a.x3 == r.x3,
              "b=%llu tid=%u tag=%u", (unsigned long long)b, tid, tag);
      }
    }
  }
  // tensor-id and tag independence: different ids/tags give different streams
  int same = 0;
  for (uint64_t b = 0; b < 256; ++b) {
    Words4 a = zf::stream_block(b, 0, 0, k0, k1), c = zf::stream_block(b, 1, 0, k0, k1);
    Words4 d = zf::stream_block(b, 0, 1, k0, k1);
    same += (a.x0 == c.x0) + (a.x0 == d.x0);
  }
  CHECK(same == 0, "streams of different tensor ids / tags collide (%d)", same);
  // element i's value depends only on (seed, id, i): scalar accessors agree with blocks
  for (uint64_t i = 0; i < 1000; i += 7) {
    float g = zf::gaussian(i, 3, k0, k1);
    Words4 w = zf::stream_block(i >> 2, 3, 0, k0, k1);
    float e, o;
    if ((i & 3) < 2) zf::box_muller(w.x0, w.x1, e, o); else zf::box_muller(w.x2, w.x3, e, o);
    CHECK(g == ((i & 1) ? o : e), "gaussian lane mapping at %llu", (unsigned long long)i);
  }
}

static void test_rademacher() {
  const uint32_t k0 = 42, k1 = 0;
  int plus = 0, total = 0;
  for (uint64_t i = 0; i < 128 * 64; ++i) {
    Words4 w = zf::stream_block(i >> 7, 5, 0, k0, k1);
    int j = (int)(i & 127), wi = j >> 5, t = j & 31;
    uint32_t x = wi == 0 ? w.x0 : wi == 1 ? w.x1 : wi == 2 ? w.x2 : w.x3;
    float expect = ((x >> t) & 1u) ? 1.0f : -1.0f;
    float z = zf::rademacher(i, 5, k0, k1);
    CHECK(z == expect, "bit order at i=%llu", (unsigned long long)i);
    plus += z > 0;
    ++total;
  }
  // explicit bit order: element 0 is bit 0 of x0, element 33 is bit 1 of x1, 127 bit 31 of x3
  Words4 w = zf::stream_block(0, 5, 0, k0, k1);
  CHECK(zf::rademacher(0, 5, k0, k1) == ((w.x0 & 1u) ? 1.f : -1.f), "element 0");
  CHECK(zf::rademacher(33, 5, k0, k1) == (((w.x1 >> 1) & 1u) ? 1.f : -1.f), "element 33");
  CHECK(zf::rademacher(127, 5, k0, k1) == ((w.x3 >> 31) ? 1.f : -1.f), "element 127");
  CHECK(std::abs(plus - total / 2) < 300, "balance %d of %d", plus, total);
}

static void test_mask() {
  const uint32_t k0 = 7, k1 = 9;
  CHECK(zf::mask(123, 0, k0, k1, 0) == 1.0f, "T=0 keeps everything");
  CHECK(zf::mask(123, 0, k0, k1, zf::MASK_ONE) == 0.0f, "T=2^24 zeroes everything");
  CHECK(zf::mask_from_word(0x000000ffu, 1) == 0.0f, "x>>8 = 0 < 1 zeroed");
  CHECK(zf::mask_from_word(0x00000100u, 1) == 1.0f, "x>>8 = 1 kept at T=1");
  CHECK(zf::mask_from_word(0xffffffffu, zf::MASK_ONE) == 0.0f, "max word zeroed at T=2^24");
  CHECK(zf::mask_from_word(0xffffffffu, zf::MASK_ONE - 1) == 1.0f, "max word kept at T=2^24-1");
  // counts: P(m=0) = T/2^24
  const int n = 1 << 20;
  const uint32_t T = (uint32_t)(0.3 * (1 << 24) + 0.5);
  int zeros = 0;
  for (int i = 0; i < n; ++i) {
    Words4 w = zf::stream_block((uint64_t)i >> 2, 2, 1, k0, k1);
    uint32_t x = zf::word(w, i & 3);
    float m = zf::mask(i, 2, k0, k1, T);
    CHECK(m == (((x >> 8) < T) ? 0.f : 1.f), "mask word mapping at %d", i);
    zeros += m == 0.0f;
  }
  double frac = (double)zeros / n, sd = std::sqrt(0.3 * 0.7 / n);
  CHECK(std::fabs(frac - 0.3) < 5 * sd, "zero fraction %f", frac);
}

static void test_uniforms() {
  CHECK(zf::u_open(0u) == 5.9604644775390625e-08f, "u_open(0) = 2^-24");
  CHECK(zf::u_open(0xffffffffu) == 1.0f, "u_open(max) = 1");
  CHECK(zf::u_closed(0u) == 0.0f, "u_closed(0) = 0");
  CHECK(zf::u_closed(0xffffffffu) == (float)(16777215.0 / 16777216.0), "u_closed(max) = 1-2^-24");
  CHECK(zf::u_open(0x000000ffu) == zf::u_open(0u), "low 8 bits ignored");
  for (uint32_t x = 0; x < 0xffffff00u; x += 0x01010101u) {
    CHECK((double)zf::u_open(x) == ((x >> 8) + 1.0) / 16777216.0, "u_open exact");
    CHECK((double)zf::u_closed(x) == (x >> 8) / 16777216.0, "u_closed exact");
  }
  // extreme Box-Muller inputs: u = 2^-24 (largest radius), u = 1 (radius 0), s = -1
  float e, o;
  zf::box_muller(0u, 0u, e, o);  // u = 2^-24, s = -1, a = -pi_f32
  double r = std::sqrt(-2.0 * std::log(std::ldexp(1.0, -24)));
  CHECK(std::fabs(e - r * std::cos(-(double)zf::PI_F32)) < 0x1p-18, "extreme lane even %g", e);
  CHECK(std::fabs(o - r * std::sin(-(double)zf::PI_F32)) < 0x1p-18, "extreme lane odd %g", o);
  CHECK(std::fabs(e) <= std::sqrt(48 * std::log(2.0)) + 1e-6, "|z| bound");
  zf::box_muller(0xffffffffu, 0xffffffffu, e, o);
  CHECK(e == 0.0f && o == 0.0f, "u=1 gives radius 0 (%g %g)", e, o);
}

static double box_muller64(uint32_t xe, uint32_t xo, bool odd) {
  double u = (double)zf::u_open(xe);
  double s = 2.0 * (double)zf::u_closed(xo) - 1.0;
  double r = std::sqrt(-2.0 * std::log(u));
  double a = (double)zf::PI_F32 * s;
  return odd ? r * std::sin(a) : r * std::cos(a);
}

static void test_gaussian() {
  double max_err = 0, max_log_rel = 0, max_sc = 0;
  double sum = 0, sum2 = 0;
  const uint32_t k0 = 0xdeadbeefu, k1 = 3;
  const int n = 1 << 22;
  for (int b = 0; b < n / 4; ++b) {
    Words4 w = zf::stream_block(b, 1, 0, k0, k1);
    float z[4];
    zf::box_muller(w.x0, w.x1, z[0], z[1]);
    zf::box_muller(w.x2, w.x3, z[2], z[3]);
    double ref[4] = {box_muller64(w.x0, w.x1, false), box_muller64(w.x0, w.x1, true),
                     box_muller64(w.x2, w.x3, false), box_muller64(w.x2, w.x3, true)};
    for (int j = 0; j < 4; ++j) {
      max_err = std::fmax(max_err, std::fabs(z[j] - ref[j]));
      sum += z[j];
      sum2 += (double)z[j] * z[j];
    }
  }
  // sweep of the elementary functions over their whole input sets
  for (uint32_t m = 1; m <= (1u << 24); m += 97) {
    float u = (float)m * 5.9604644775390625e-08f;
    double l = std::log((double)u);
    if (l != 0) max_log_rel = std::fmax(max_log_rel, std::fabs((zf::log_f32(u) - l) / l));
  }
  for (uint32_t m = 0; m < (1u << 24); m += 89) {
    float s = 2.0f * ((float)m * 5.9604644775390625e-08f) - 1.0f;
    float a = zf::PI_F32 * s, sn, cs;
    zf::sincos_f32(a, sn, cs);
    max_sc = std::fmax(max_sc, std::fmax(std::fabs(sn - std::sin((double)a)),
                                         std::fabs(cs - std::cos((double)a))));
  }
  double mean = sum / n, var = sum2 / n - mean * mean;
  std::printf("gaussian: max |z - z64| = %.3g (bound 2^-18 = %.3g); log rel err %.3g; "
              "sincos abs err %.3g; mean %.4f var %.4f\n",
              max_err, std::ldexp(1.0, -18), max_log_rel, max_sc, mean, var);
  CHECK(max_err <= std::ldexp(1.0, -18), "gaussian error %g", max_err);
  CHECK(max_err <= 4e-6, "gaussian error %g", max_err);
  CHECK(std::fabs(mean) < 5e-3 && std::fabs(var - 1.0) < 5e-3, "moments %f %f", mean, var);
}

int main(int argc, char** argv) {
  std::string which = argc > 1 ? argv[1] : "all";
  bool all = which == "all";
  if (all || which == "kat") test_kat();
  if (all || which == "mapping") test_mapping();
  if (all || which == "rademacher") test_rademacher();
  if (all || which == "mask") test_mask();
  if (all || which == "uniforms") test_uniforms();
  if (all || which == "gaussian") test_gaussian();
  if (failures()) return 1;
  std::printf("ok (%s)\n", which.c_str());
  return 0;
}
