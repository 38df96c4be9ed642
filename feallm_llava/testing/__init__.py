"""Stand-ins for what cannot run here, speaking the real protocols.

- `fake_openai`: a local OpenAI-compatible HTTP server on 127.0.0.1 (chat completions,
  the Batch API's calls, scripted faults and latency), for the tests, the annotation
  benchmark and offline dry runs of `build-dataset --annotator openai --base-url ...`.
"""
