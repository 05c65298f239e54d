<?php
// The example app: shows its start page from the shared data folder and counts visits there.
$config = @include __DIR__ . '/../config/app.php';
$release = is_array($config) ? $config['release'] : 'unknown';
header('X-Release: ' . $release);
$data = is_array($config) ? $config['datadir'] : __DIR__ . '/../data';
@file_put_contents("$data/visits.log", gmdate('c') . "\n", FILE_APPEND | LOCK_EX);
echo 'rainbow ' . $release . "\n" . @file_get_contents("$data/pages/start.txt");
