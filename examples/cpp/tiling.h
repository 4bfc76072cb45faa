// mlc-vision tiling contract in C++ (docs/tiling.md): one image of any size -> fixed-size tiles.
//
// The same rules as mlc_vision/runtime/tiling.py, written once for C++, standard library only:
//   * InternVL dynamic tiles: ChooseGrid (aspect-ratio rule with its tie break), InternVLTiles
//     (resize to the grid's canvas, cut row-major, thumbnail last when the grid has several tiles).
//   * LLaVA-NeXT anyres: SelectBestResolution over the pinpoints, AnyresTiles (fit, pad centered
//     with black, cut row-major, the base image first) and PackAnyres (unpad, LLaVA-OneVision's
//     anyres_max shrink, image_newline per row).
//   * Resize: transformers' default (torchvision) processors on the CPU resize uint8 images with
//     ATen's antialiased integer kernel: int16 fixed-point weights, horizontal pass, clamp to
//     uint8, vertical pass. ResizeBicubic does that arithmetic, so tiles are bit-exact to the
//     Python runtime's preprocessing backend "torchvision" (Pillow's, "pil", is not implemented here).
// Grids are height x width (rows x cols). Images are HWC uint8 RGB.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mlc_vision {

struct Grid {
  int rows = 1, cols = 1;
  int count() const { return rows * cols; }
  std::string str() const { return std::to_string(rows) + "x" + std::to_string(cols); }
  bool operator==(const Grid& o) const { return rows == o.rows && cols == o.cols; }
};

struct Image {
  int height = 0, width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3
};

// ---- the grid rules -------------------------------------------------------------------------

inline void CheckTileRange(int min_tiles, int max_tiles) {
  if (min_tiles < 1 || max_tiles < min_tiles) {
    throw std::runtime_error("tile counts out of range: min_tiles " + std::to_string(min_tiles) + ", max_tiles " +
                             std::to_string(max_tiles) + " (need 1 <= min_tiles <= max_tiles)");
  }
}

// Every grid with min_tiles <= rows * cols <= max_tiles: columns outer, rows inner, stably sorted by count.
inline std::vector<Grid> CandidateGrids(int min_tiles, int max_tiles) {
  CheckTileRange(min_tiles, max_tiles);
  std::vector<Grid> grids;
  for (int cols = 1; cols <= max_tiles; ++cols)
    for (int rows = 1; rows <= max_tiles; ++rows)
      if (rows * cols >= min_tiles && rows * cols <= max_tiles) grids.push_back({rows, cols});
  std::stable_sort(grids.begin(), grids.end(), [](const Grid& a, const Grid& b) { return a.count() < b.count(); });
  return grids;
}

// InternVL: the grid whose cols / rows is closest to width / height; on an exact tie the later grid
// wins when the image's area exceeds half of the grid's pixel area.
inline Grid ChooseGrid(int height, int width, int tile, int min_tiles, int max_tiles) {
  if (height < 1 || width < 1) throw std::runtime_error("cannot tile an empty image");
  double aspect = static_cast<double>(width) / height;
  double area = static_cast<double>(width) * height;
  Grid best{1, 1};
  double best_diff = std::numeric_limits<double>::infinity();
  for (const Grid& g : CandidateGrids(min_tiles, max_tiles)) {
    double diff = std::abs(aspect - static_cast<double>(g.cols) / g.rows);
    if (diff < best_diff) {
      best = g;
      best_diff = diff;
    } else if (diff == best_diff && area > 0.5 * tile * tile * g.count()) {
      best = g;
    }
  }
  return best;
}

// LLaVA-NeXT: the (height, width) pinpoint keeping the most image pixels, then wasting the least.
inline std::pair<int, int> SelectBestResolution(int height, int width, const std::vector<std::pair<int, int>>& pins) {
  std::pair<int, int> best{0, 0};
  long long best_effective = 0;
  double best_wasted = std::numeric_limits<double>::infinity();
  for (const auto& [pin_h, pin_w] : pins) {
    double scale = std::min(static_cast<double>(pin_w) / width, static_cast<double>(pin_h) / height);
    long long fitted_w = static_cast<long long>(width * scale), fitted_h = static_cast<long long>(height * scale);
    long long effective = std::min(fitted_w * fitted_h, static_cast<long long>(width) * height);
    long long wasted = static_cast<long long>(pin_w) * pin_h - effective;
    if (effective > best_effective || (effective == best_effective && wasted < best_wasted)) {
      best = {pin_h, pin_w};
      best_effective = effective;
      best_wasted = static_cast<double>(wasted);
    }
  }
  if (best.first == 0) throw std::runtime_error("the library has no grid pinpoints to choose from");
  return best;
}

// The image's size inside (target_h, target_w), aspect kept, the scaled side rounded up.
inline std::pair<int, int> FittedSize(int height, int width, int target_h, int target_w) {
  double scale_w = static_cast<double>(target_w) / width, scale_h = static_cast<double>(target_h) / height;
  if (scale_w < scale_h) return {std::min(static_cast<int>(std::ceil(height * scale_w)), target_h), target_w};
  return {target_h, std::min(static_cast<int>(std::ceil(width * scale_h)), target_w)};
}

inline void CheckPinpoints(const std::vector<std::pair<int, int>>& pins, int tile) {
  if (pins.empty()) throw std::runtime_error("anyres tiling needs at least one grid pinpoint");
  for (const auto& [h, w] : pins) {
    if (h < tile || w < tile || h % tile || w % tile) {
      throw std::runtime_error("grid pinpoint [" + std::to_string(h) + ", " + std::to_string(w) +
                               "] is not a [height, width] multiple of the tile size " + std::to_string(tile));
    }
  }
}

// ---- resize (ATen's antialiased uint8 bicubic) -----------------------------------------------------

inline double Bicubic(double x) {  // Keys' cubic, a = -0.5, as ATen and Pillow write it
  const double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2.0) return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a;
  return 0.0;
}

struct AxisWeights {
  std::vector<int64_t> first;  // first input index of each output
  std::vector<int32_t> weights;  // [out][taps]
  int taps = 0, precision = 0;
};

// Weights in double, normalized to sum 1, then int16 fixed point with the most bits that keep the
// largest weight below 2^15 (ATen's _compute_index_ranges_int16_weights).
inline AxisWeights ComputeWeights(int in_size, int out_size) {
  const int interp_size = 4;
  double scale = static_cast<double>(in_size) / out_size;
  double support = scale >= 1.0 ? interp_size * 0.5 * scale : interp_size * 0.5;
  double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  AxisWeights out;
  out.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  std::vector<double> w(static_cast<size_t>(out_size) * out.taps, 0.0);
  double w_max = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < out_size; ++i) {
    double center = scale * (i + 0.5);
    int64_t first = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
    int64_t count = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in_size) - first;
    out.first.push_back(first);
    double* row = &w[static_cast<size_t>(i) * out.taps];
    double total = 0.0;
    for (int j = 0; j < out.taps; ++j) {
      row[j] = j < count ? Bicubic((static_cast<double>(j + first) - center + 0.5) * invscale) : 0.0;
      total += row[j];
    }
    for (int j = 0; j < out.taps; ++j) {
      if (total != 0.0) row[j] /= total;
      w_max = std::max(w_max, row[j]);
    }
  }
  while (out.precision < 22 && static_cast<int64_t>(0.5 + w_max * (int64_t{1} << (out.precision + 1))) < (1 << 15)) {
    ++out.precision;
  }
  out.weights.resize(w.size());
  for (size_t k = 0; k < w.size(); ++k) {
    double scaled = w[k] * static_cast<double>(int64_t{1} << out.precision);
    out.weights[k] = static_cast<int32_t>(std::trunc(scaled < 0 ? scaled - 0.5 : scaled + 0.5));
  }
  return out;
}

// One separable pass along the rows (vertical) or the columns (horizontal) of an HWC image.
inline Image ResizeAxis(const Image& in, int out_size, bool vertical) {
  int in_size = vertical ? in.height : in.width;
  if (in_size == out_size) return in;
  AxisWeights aw = ComputeWeights(in_size, out_size);
  Image out;
  out.height = vertical ? out_size : in.height;
  out.width = vertical ? in.width : out_size;
  out.rgb.resize(static_cast<size_t>(out.height) * out.width * 3);
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int o = vertical ? y : x;
      const int32_t* wr = &aw.weights[static_cast<size_t>(o) * aw.taps];
      for (int c = 0; c < 3; ++c) {
        int32_t acc = 1 << (aw.precision - 1);
        for (int j = 0; j < aw.taps; ++j) {
          int src = static_cast<int>(std::min<int64_t>(aw.first[o] + j, in_size - 1));  // padding taps weigh 0
          int sy = vertical ? src : y, sx = vertical ? x : src;
          acc += static_cast<int32_t>(in.rgb[(static_cast<size_t>(sy) * in.width + sx) * 3 + c]) * wr[j];
        }
        out.rgb[(static_cast<size_t>(y) * out.width + x) * 3 + c] =
            static_cast<uint8_t>(std::clamp(acc >> aw.precision, 0, 255));
      }
    }
  }
  return out;
}

// torchvision's CPU resize of a uint8 image: horizontal pass, clamp to uint8, vertical pass.
inline Image ResizeBicubic(const Image& in, int height, int width) {
  return ResizeAxis(ResizeAxis(in, width, /*vertical=*/false), height, /*vertical=*/true);
}

// ---- tiles ------------------------------------------------------------------------------------------

// tiles: [count, tile, tile, 3] uint8, in the library's order.
struct Tiles {
  Grid grid;
  int count = 0;
  bool thumbnail = false, base = false;
  std::vector<uint8_t> pixels;
};

inline void AppendCrop(const Image& canvas, int top, int left, int tile, std::vector<uint8_t>& dst) {
  for (int y = 0; y < tile; ++y) {
    const uint8_t* row = &canvas.rgb[(static_cast<size_t>(top + y) * canvas.width + left) * 3];
    dst.insert(dst.end(), row, row + static_cast<size_t>(tile) * 3);
  }
}

inline void AppendGrid(const Image& canvas, const Grid& grid, int tile, Tiles& tiles) {
  for (int r = 0; r < grid.rows; ++r)
    for (int c = 0; c < grid.cols; ++c) AppendCrop(canvas, r * tile, c * tile, tile, tiles.pixels);
  tiles.count += grid.count();
}

inline Tiles InternVLTiles(const Image& image, int tile, int min_tiles, int max_tiles, bool thumbnail) {
  Tiles tiles;
  tiles.grid = ChooseGrid(image.height, image.width, tile, min_tiles, max_tiles);
  AppendGrid(ResizeBicubic(image, tiles.grid.rows * tile, tiles.grid.cols * tile), tiles.grid, tile, tiles);
  if (thumbnail && tiles.grid.count() > 1) {
    AppendCrop(ResizeBicubic(image, tile, tile), 0, 0, tile, tiles.pixels);
    tiles.count += 1;
    tiles.thumbnail = true;
  }
  return tiles;
}

inline Tiles AnyresTiles(const Image& image, int tile, const std::vector<std::pair<int, int>>& pins) {
  CheckPinpoints(pins, tile);
  auto [target_h, target_w] = SelectBestResolution(image.height, image.width, pins);
  auto [new_h, new_w] = FittedSize(image.height, image.width, target_h, target_w);
  Image resized = ResizeBicubic(image, new_h, new_w);
  Image canvas{target_h, target_w, std::vector<uint8_t>(static_cast<size_t>(target_h) * target_w * 3, 0)};
  int top = (target_h - new_h) / 2, left = (target_w - new_w) / 2;
  for (int y = 0; y < new_h; ++y) {
    std::copy_n(&resized.rgb[static_cast<size_t>(y) * new_w * 3], static_cast<size_t>(new_w) * 3,
                &canvas.rgb[(static_cast<size_t>(top + y) * target_w + left) * 3]);
  }
  Tiles tiles;
  tiles.grid = {target_h / tile, target_w / tile};
  tiles.base = true;
  AppendCrop(ResizeBicubic(image, tile, tile), 0, 0, tile, tiles.pixels);
  tiles.count = 1;
  AppendGrid(canvas, tiles.grid, tile, tiles);
  return tiles;
}

// ---- anyres packing ------------------------------------------------------------------------------

// transformers' unpad_image on a rows x cols token map: [row_begin, row_end) x [col_begin, col_end).
// The scaled side is rounded to 7 decimals, then truncated.
inline std::pair<std::pair<int, int>, std::pair<int, int>> UnpaddedExtent(int rows, int cols, int height, int width) {
  auto round7 = [](double v) { return static_cast<int>(std::llround(v * 1e7) / 10000000); };
  if (static_cast<double>(width) / height > static_cast<double>(cols) / rows) {
    int new_rows = round7(height * (static_cast<double>(cols) / width));
    int pad = (rows - new_rows) / 2;
    return {{pad, rows - pad}, {0, cols}};
  }
  int new_cols = round7(width * (static_cast<double>(rows) / height));
  int pad = (cols - new_cols) / 2;
  return {{0, rows}, {pad, cols - pad}};
}

// LLaVA-OneVision's anyres_max_N: the size an unpadded rows x cols token map is shrunk to, or
// {0, 0} when it is kept (ratio = sqrt(rows * cols / (N * side^2)) above 1.1).
inline std::pair<int, int> OneVisionShrunkSize(int rows, int cols, int side, int anyres_max) {
  if (anyres_max <= 0) return {0, 0};
  double ratio = std::sqrt(static_cast<double>(rows) * cols / (static_cast<double>(anyres_max) * side * side));
  if (ratio <= 1.1) return {0, 0};
  return {static_cast<int>(std::floor(rows / ratio)), static_cast<int>(std::floor(cols / ratio))};
}

struct LinearTaps {
  std::vector<int64_t> first, second;
  std::vector<float> w0, w1;
};

// torch's bilinear taps (align_corners=False), in float32.
inline LinearTaps BilinearTaps(int in_size, int out_size) {
  LinearTaps t;
  float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  for (int i = 0; i < out_size; ++i) {
    float src = std::max(scale * (static_cast<float>(i) + 0.5f) - 0.5f, 0.0f);
    int64_t first = static_cast<int64_t>(src);
    float lam1 = std::clamp(src - static_cast<float>(first), 0.0f, 1.0f);
    t.first.push_back(first);
    t.second.push_back(first + (first < in_size - 1 ? 1 : 0));
    t.w0.push_back(1.0f - lam1);
    t.w1.push_back(lam1);
  }
  return t;
}

// [rows, cols, channels] float32 -> [out_rows, out_cols, channels]:
// (x00 * w0 + x01 * w1) * h0 + (x10 * w0 + x11 * w1) * h1.
inline std::vector<float> ShrinkBilinear(const std::vector<float>& map, int rows, int cols, int channels,
                                         int out_rows, int out_cols) {
  LinearTaps r = BilinearTaps(rows, out_rows), c = BilinearTaps(cols, out_cols);
  std::vector<float> out(static_cast<size_t>(out_rows) * out_cols * channels);
  auto at = [&](int64_t y, int64_t x, int k) { return map[(static_cast<size_t>(y) * cols + x) * channels + k]; };
  for (int i = 0; i < out_rows; ++i)
    for (int j = 0; j < out_cols; ++j)
      for (int k = 0; k < channels; ++k) {
        float top = at(r.first[i], c.first[j], k) * c.w0[j] + at(r.first[i], c.second[j], k) * c.w1[j];
        float bottom = at(r.second[i], c.first[j], k) * c.w0[j] + at(r.second[i], c.second[j], k) * c.w1[j];
        out[(static_cast<size_t>(i) * out_cols + j) * channels + k] = top * r.w0[i] + bottom * r.w1[i];
      }
  return out;
}

// features: [1 + tiles, side * side, channels] of one element type T (base first) -> [tokens, channels]:
// the tiles' token maps joined, cropped to the image (UnpaddedExtent), shrunk for OneVision's
// anyres_max (float only), newline after each row, the base image's tokens first.
template <typename T>
std::vector<T> PackAnyres(const std::vector<T>& features, int tokens, int channels, const Grid& grid, int height,
                          int width, const std::vector<T>* newline, int anyres_max = 0) {
  int side = static_cast<int>(std::lround(std::sqrt(static_cast<double>(tokens))));
  if (side * side != tokens) throw std::runtime_error("anyres packing needs a square token grid per tile");
  auto [row_range, col_range] = UnpaddedExtent(grid.rows * side, grid.cols * side, height, width);
  int rows = row_range.second - row_range.first, cols = col_range.second - col_range.first;
  std::vector<T> map;
  map.reserve(static_cast<size_t>(rows) * cols * channels);
  for (int r = row_range.first; r < row_range.second; ++r) {
    for (int c = col_range.first; c < col_range.second; ++c) {
      int tile = (r / side) * grid.cols + (c / side);  // row-major tiles after the base
      int token = (r % side) * side + (c % side);
      size_t at = (static_cast<size_t>(1 + tile) * tokens + token) * channels;
      map.insert(map.end(), features.begin() + at, features.begin() + at + channels);
    }
  }
  auto [shrunk_rows, shrunk_cols] = OneVisionShrunkSize(rows, cols, side, anyres_max);
  if (shrunk_rows > 0) {
    if constexpr (std::is_same_v<T, float>) {
      map = ShrinkBilinear(map, rows, cols, channels, shrunk_rows, shrunk_cols);
      rows = shrunk_rows;
      cols = shrunk_cols;
    } else {
      throw std::runtime_error("anyres_max shrinking is implemented for float32 libraries only");
    }
  }
  std::vector<T> out(features.begin(), features.begin() + static_cast<size_t>(tokens) * channels);  // base image
  for (int r = 0; r < rows; ++r) {
    out.insert(out.end(), map.begin() + static_cast<size_t>(r) * cols * channels,
               map.begin() + static_cast<size_t>(r + 1) * cols * channels);
    if (newline) out.insert(out.end(), newline->begin(), newline->end());
  }
  return out;
}

}  // namespace mlc_vision
