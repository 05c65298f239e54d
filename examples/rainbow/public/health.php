<?php
$release = json_decode(@file_get_contents(__DIR__ . '/../RELEASE.json'), true);
header('X-Release: ' . ($release['name'] ?? 'unknown'));
echo json_encode(['status' => 'ok', 'release' => $release['name'] ?? null]) . "\n";
