"""Helpers shared by the tests and the benchmarks (no tests here):

* `webserver`: a loopback HTTP server serving generated images and the web's failures (also a script);
* `s3faults`: a fault-injecting HTTP proxy in front of the moto S3 server (the `s3_faults` fixture);
* `images`: synthetic pictures: random scenes and their near duplicates, learnable captioned shapes;
* `shards`: synthetic raw pools (raw shards, keep list) and training shards with their manifest;
* `train_config`: `--set` overrides for a tiny training run;
* `openclip_twin`: open_clip's model of the same architecture as one of ours (open_clip is a test and
  benchmark extra, never imported by clip/).
"""
