release:
  rainbow:
    files:
      crontab.xml:
        contents: |
          <cron><job schedule="* * * * *">php artisan schedule:run</job></cron>
