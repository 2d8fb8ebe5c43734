"""`torchx run` reading a job spec from object storage (a moto S3 server) at submission, through torchx's CLI in
this process (tests/support/commands.py): the job carries the spec's content, and a missing spec is one line."""

from service.spec import StorageSpec
from service.storage.filesystem import filesystem
from tests.support.commands import containers, shipped_spec, torchx, torchx_job


def test_a_spec_on_object_storage_is_read_at_submission(s3_server, s3_bucket, tmp_path):
    fs, path = filesystem(f"{s3_bucket}/specs/x.yaml", StorageSpec(endpoint_url=s3_server.endpoint_url))
    fs.pipe_file(path, b"data: {dataset: digits}\noptim: {epochs: 4, warmup_epochs: 1}\n")
    endpoint = f"storage.endpoint_url={s3_server.endpoint_url}"
    job = torchx_job("barlowtwins.train", "--spec", f"{s3_bucket}/specs/x.yaml", endpoint,
                     f"run.output={s3_bucket}/runs/x", cwd=tmp_path)
    shipped = shipped_spec(containers(job)[0])
    assert shipped["optim"]["epochs"] == 4 and shipped["storage"]["endpoint_url"] == s3_server.endpoint_url
    missing = torchx("run", "--workspace", "", "--dryrun", "-s", "kubernetes", "barlowtwins.train",
                     "--spec", f"{s3_bucket}/specs/nope.yaml", endpoint, cwd=tmp_path)
    assert missing.returncode == 1 and "specs/nope.yaml does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
