// What the native record readers (_jsonrows.cpp, _avrorows.cpp) share: a strong reference holder and strict
// UTF-8 (as Python's bytes.decode() accepts it).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace rows_common {

typedef const unsigned char* P;

// A strong reference, released when it goes out of scope.
class Owned {
  public:
    explicit Owned(PyObject* o) : o_(o) {}
    ~Owned() { Py_XDECREF(o_); }
    Owned(const Owned&) = delete;
    Owned& operator=(const Owned&) = delete;
    PyObject* get() const { return o_; }
    explicit operator bool() const { return o_ != nullptr; }

  private:
    PyObject* o_;
};

// One UTF-8 sequence starting at p (a byte >= 0x80): its length, or 0 when it is not well formed (overlong,
// a surrogate, beyond U+10FFFF, truncated).
inline int utf8_len(P p, P e) {
    unsigned char c = p[0];
    if (c >= 0xC2 && c <= 0xDF) {
        return (e - p >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    }
    if (c >= 0xE0 && c <= 0xEF) {
        if (e - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && p[1] < 0xA0) return 0;  // overlong
        if (c == 0xED && p[1] >= 0xA0) return 0;  // a surrogate
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (e - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && p[1] < 0x90) return 0;  // overlong
        if (c == 0xF4 && p[1] >= 0x90) return 0;  // beyond U+10FFFF
        return 4;
    }
    return 0;
}

}  // namespace rows_common
