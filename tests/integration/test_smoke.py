def test_smoke(cluster):
    res, ret = cluster.run("release.deploy", "rainbow", "env=test", "ref=v1.0.0")
    assert ret["result"], ret
    assert res.returncode == 0
