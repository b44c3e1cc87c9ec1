#include "src/base/agreement.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

#include "src/base/check.h"
#include "src/base/fault.h"

namespace ringattn {

namespace {

// What one rank reports: whether it failed, the error code and the start of the message.
struct Verdict {
  int32_t failed = 0;
  int32_t code = 0;
  char message[504] = {};
};

constexpr size_t kInlineValues = 16;

// Round 0: one hash of everything (the field names included) and the field count.
struct Digest {
  uint64_t hash = 0;
  int64_t fields = 0;
};

// Round 1, per field: its length, hash and first values (zero padded).
struct FieldSummary {
  int64_t count = 0;
  uint64_t hash = 0;
  std::array<int64_t, kInlineValues> values{};
};

uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t hash_values(const std::vector<int64_t>& values) {
  uint64_t h = mix64(values.size());
  for (int64_t v : values) h = mix64(h ^ static_cast<uint64_t>(v));
  return h;
}

uint64_t hash_text(const std::string& text) {
  uint64_t h = mix64(text.size());
  for (char c : text) h = mix64(h ^ static_cast<unsigned char>(c));
  return h;
}

FieldSummary summarize(const AgreedField& f) {
  FieldSummary s;
  s.count = static_cast<int64_t>(f.values.size());
  s.hash = hash_values(f.values);
  std::copy_n(f.values.begin(), std::min(f.values.size(), kInlineValues), s.values.begin());
  return s;
}

bool same(const FieldSummary& a, const FieldSummary& b) {
  return a.count == b.count && a.hash == b.hash && a.values == b.values;
}

std::string format_values(const FieldSummary& s) {
  std::ostringstream os;
  os << '[';
  const size_t shown = std::min(static_cast<size_t>(s.count), kInlineValues);
  for (size_t i = 0; i < shown; ++i) os << (i ? "," : "") << s.values[i];
  if (static_cast<size_t>(s.count) > shown) {
    os << ",...] (" << s.count << " values, hash 0x" << std::hex << s.hash << std::dec << ')';
  } else {
    os << ']';
  }
  return os.str();
}

// "rank 3" or "ranks 0-2,5".
std::string format_ranks(const std::vector<int>& ranks) {
  std::ostringstream os;
  os << (ranks.size() == 1 ? "rank " : "ranks ");
  for (size_t i = 0; i < ranks.size();) {
    size_t j = i;
    while (j + 1 < ranks.size() && ranks[j + 1] == ranks[j] + 1) ++j;
    os << (i ? "," : "") << ranks[i];
    if (j > i) os << '-' << ranks[j];
    i = j + 1;
  }
  return os.str();
}

// "rank 0 has [1], ranks 1-3 have [2]": the ranks grouped by value, in order of first rank.
template <typename T, typename Same, typename Format>
std::string describe_groups(const std::vector<T>& all, Same&& equal, Format&& format) {
  std::vector<std::vector<int>> groups;
  for (int r = 0; r < static_cast<int>(all.size()); ++r) {
    auto g = std::find_if(groups.begin(), groups.end(), [&](const std::vector<int>& x) {
      return equal(all[static_cast<size_t>(r)], all[static_cast<size_t>(x[0])]);
    });
    if (g == groups.end()) {
      groups.push_back({r});
    } else {
      g->push_back(r);
    }
  }
  std::ostringstream os;
  for (size_t g = 0; g < groups.size(); ++g) {
    os << (g ? ", " : "") << format_ranks(groups[g]) << (groups[g].size() == 1 ? " has " : " have ")
       << format(all[static_cast<size_t>(groups[g][0])]);
  }
  return os.str();
}

template <typename T>
std::vector<T> gather(Communicator& comm, const std::vector<char>& mine) {
  std::vector<T> all(static_cast<size_t>(comm.size()) * (mine.size() / sizeof(T)));
  comm.allgather(mine.data(), all.data(), mine.size());
  return all;
}

}  // namespace

void check_on_all_ranks(Communicator& comm, const std::function<void()>& check) {
  Verdict mine;
  std::exception_ptr error;
  try {
    detail::fault_point("agree");
    check();
  } catch (...) {
    // Every exception, not only ringattn's: a rank that threw anything else (bad_alloc) and
    // skipped the allgather would leave the others waiting in it.
    const Error e = as_error(std::current_exception(), "checking the input");
    error = std::make_exception_ptr(e);
    mine.failed = 1;
    mine.code = static_cast<int32_t>(e.code());
    std::strncpy(mine.message, e.what(), sizeof(mine.message) - 1);
  }
  std::vector<Verdict> all(static_cast<size_t>(comm.size()));
  comm.allgather(&mine, all.data(), sizeof(Verdict));
  if (error) std::rethrow_exception(error);
  for (size_t r = 0; r < all.size(); ++r) {
    if (all[r].failed) {
      fail(static_cast<ErrorCode>(all[r].code), "rank ", r, " of ", all.size(),
           " rejected its input, so every rank stops: ", all[r].message);
    }
  }
}

std::vector<char> detail::agreement_payload(int round, const std::vector<AgreedField>& fields) {
  std::vector<char> bytes;
  if (round == 0) {
    Digest d;
    d.fields = static_cast<int64_t>(fields.size());
    d.hash = mix64(fields.size());
    for (const AgreedField& f : fields)
      d.hash = mix64(d.hash ^ hash_text(f.name) ^ hash_values(f.values));
    bytes.resize(sizeof(d));
    std::memcpy(bytes.data(), &d, sizeof(d));
    return bytes;
  }
  bytes.resize(fields.size() * sizeof(FieldSummary));
  for (size_t i = 0; i < fields.size(); ++i) {
    const FieldSummary s = summarize(fields[i]);
    std::memcpy(bytes.data() + i * sizeof(FieldSummary), &s, sizeof(s));
  }
  return bytes;
}

void check_same_on_all_ranks(Communicator& comm, const std::string& what,
                             const std::vector<AgreedField>& fields) {
  // Every rank decides from the same gathered data, so all of them make the second
  // allgather or none does.
  const std::vector<Digest> digests = gather<Digest>(comm, detail::agreement_payload(0, fields));
  const auto same_digest = [](const Digest& a, const Digest& b) {
    return a.hash == b.hash && a.fields == b.fields;
  };
  if (std::all_of(digests.begin(), digests.end(),
                  [&](const Digest& d) { return same_digest(d, digests[0]); })) {
    return;
  }
  std::ostringstream os;
  os << "ranks disagree on " << what << ": ";
  const bool same_count = std::all_of(digests.begin(), digests.end(), [&](const Digest& d) {
    return d.fields == digests[0].fields;
  });
  if (!same_count) {
    os << describe_groups(
              digests, [](const Digest& a, const Digest& b) { return a.fields == b.fields; },
              [](const Digest& d) { return std::to_string(d.fields) + " fields"; })
       << " (they made different calls)";
  } else {
    const size_t n = fields.size(), size = static_cast<size_t>(comm.size());
    const std::vector<FieldSummary> all =
        gather<FieldSummary>(comm, detail::agreement_payload(1, fields));
    bool first = true;
    for (size_t i = 0; i < n; ++i) {
      std::vector<FieldSummary> column(size);
      for (size_t r = 0; r < size; ++r) column[r] = all[r * n + i];
      if (std::all_of(column.begin(), column.end(),
                      [&](const FieldSummary& x) { return same(x, column[0]); })) {
        continue;
      }
      os << (first ? "" : "; ") << (fields[i].name.empty() ? "" : fields[i].name + ": ")
         << describe_groups(column, same, format_values);
      first = false;
    }
    if (first) os << "the field names differ (they made different calls)";
  }
  os << "; pass the same configuration on every rank";
  fail(ErrorCode::kCommunication, os.str());
}

void check_same_on_all_ranks(Communicator& comm, const std::string& what,
                             const std::vector<int64_t>& values) {
  check_same_on_all_ranks(comm, what, std::vector<AgreedField>{{std::string(), values}});
}

void check_on_grid(Communicator& seq, Communicator& head, const std::function<void()>& check) {
  check_on_all_ranks(head, [&] { check_on_all_ranks(seq, check); });
}

void agree_on_grid(Communicator& seq, Communicator& head, const std::string& what,
                   const std::vector<AgreedField>& fields) {
  check_on_all_ranks(head, [&] { check_same_on_all_ranks(seq, what, fields); });
  check_on_all_ranks(seq, [&] { check_same_on_all_ranks(head, what, fields); });
}

}  // namespace ringattn
