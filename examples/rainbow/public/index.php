<?php
// The example app: says which release it runs, so a deploy can be seen working.
$release = json_decode(@file_get_contents(__DIR__ . '/../RELEASE.json'), true);
header('X-Release: ' . ($release['name'] ?? 'unknown'));
echo 'rainbow ' . ($release['name'] ?? 'unknown') . "\n";
