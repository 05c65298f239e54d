<?php
// The health endpoint: names the release this node runs. The name comes from config/app.php,
// which salt-release renders into each release ({{ release.name }}), so the deploy's health
// check (expect: release) can tell the new release from the old one.
$config = @include __DIR__ . '/../config/app.php';
$release = is_array($config) ? $config['release'] : 'unknown';
$writable = is_array($config) && is_writable($config['datadir']);
header('X-Release: ' . $release);
http_response_code($writable ? 200 : 503);
echo json_encode(['status' => $writable ? 'ok' : 'data not writable', 'release' => $release]) . "\n";
