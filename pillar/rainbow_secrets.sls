#!yaml|gpg
# Secrets of the rainbow app, encrypted at rest to the EXAMPLE key in gpgkeys/
# (its private half was thrown away: replace both with your master's key).
# Encrypt a value:  printf %s "value" | gpg --armor --encrypt -r <your master key>
release:
  rainbow:
    secrets:
      db_password: |
        -----BEGIN PGP MESSAGE-----

        hQGMA5QJpl08dBznAQv/bb6dJgYP8uoUUBXnR960lQMiKSaLUWGq8/9K5inM4Idz
        lV6EAgeMsgLqWGtCc4L9xZnhfGKkmC6sfqPH6qdN/f1ju70rIzd5VvNqz0jJLEUY
        nVuQ7QBDZZbtDZsal5YkfkO9qNiWn2cKXO2xdNff3JW0olZv/0B56FxvgG2pnb5v
        vMJerwfrDo7hDfgIZiEs/9i8km3+Uuz+Ua/d5Zsk/MhvwSsI5RzyFs8SEyz6+F6a
        GphOwbn4GWMEI9eYA+XEqDVXiDB/ysVtVZprDAvyk4jXAEruyZ5sixErHAmB+OSw
        +FrV7VNXW+uxKA9/liEsZn4kJQ/PRcnEEKamf+oG7vQ07Ya/kMz6kgaQi/nxEMAm
        RWIF+Jm3tc/kvxot7ug4q8HE02o8gvXgbdLfp2iwPGCU03pgyBK0ZczbnmoFAi1G
        ewNS9UnVsrfxfTAbAye2t+lVBliFTPGz5d2foCPFUuuQCQaRllnXYvvFvQB/NcpF
        N534Xkomao7IWLAgSR9R0k4BvI5tXD8CtC9PCTDITtWJ1MvSwOZ1MNE1tT75+pdU
        175aT4MUeaQ+XOFo3UnvMONPcweCBI4kFjYGboqkn2DQVCQ8wNBVWMVt+MX0gE0=
        =z24t
        -----END PGP MESSAGE-----
      pay_api_key: |
        -----BEGIN PGP MESSAGE-----

        hQGMA5QJpl08dBznAQv+LIIddqkRTtfOQArQdxJGV0ax7/eQnZDF6h+EbcsGXo8S
        aNckNnP8SMK6M9KvKyRDmRCHnWwKFDGERhsH+jYKN8UJe2TTakscHJfnhXL/IN12
        8gGObuQX5A8l84euZdbG8z+TJCy/zkG/HKAjP7s7Z58JjvTzRGuyWclSv31Nb/k+
        FvYKGOkQoyxTvx8BQJoOOzPOTVB8Blyd/mdqP5dPmqzZ1ll1o5BC1vm9gpXlIjhu
        iS12xMrUvA5syoeX7qULCnPBJBbBNjIMyRSiaJ36Q6lE1KTMnyJINiZFEGVJtu51
        I1DZBVBX+ppBLVE5p1SmR971cVLoa8SBSRYIFcXkHZAB6UbDWkcRFUG5qSkKHT39
        3JiG8yG7vEg14UnxXo5FP9B1YpPHpSku7Ej9vHfZtp8YzhPMwvXs4/TXCYfy+a0W
        2lUn3gyJbLXkRWW6Ex2o8TTOJwgF2ARTw+V8y7PQagzShE5oh6BkZWRQscxHAGdW
        mqZNUWZ38DVuA+YvxjRY0k4B3oWHVNEsKwV5Cf1vqskBl7Ery/WqVdq/v0PIOXwm
        IfEiFOSMQqCEbZ+0pCRG7KSMg1H/VDRXfDbR1Gzcllu8wb5HZwQJMXyNni/kvjk=
        =CHsl
        -----END PGP MESSAGE-----
