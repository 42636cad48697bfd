"""The reliability suite: a Jepsen-style bank workload under faults (issue 11)."""
